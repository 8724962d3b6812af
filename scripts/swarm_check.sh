#!/usr/bin/env bash
# make swarm-check: the stack of deploy/swarm/ on a real single-node Docker Swarm, under faults.
#  1. the images, as make compose-check builds them (offline base, host wheelhouse; shared code in
#     scripts/lib/docker_check.sh), and a Docker daemon (started as root when none runs);
#  2. `docker swarm init` on 127.0.0.1 (when this host is in no swarm), the write-token and
#     PostgreSQL password secrets (deploy.sh is first shown to refuse the stack without them, naming
#     each), node labels for the indexer replicas, PostgreSQL, the image store and Prometheus,
#     deploy.sh, wait until every task is healthy;
#  3. the grpcurl sample queries of compose-check against the gateway on 127.0.0.1, the web edge
#     (page, /predict/image, a JSON search, a photo from the image store) and Prometheus's `up` == 1
#     for every task of every service (found by DNS, tasks.<service>); the routing
#     mesh on a free port, or, on a kernel without IPVS (no routing mesh, no virtual IPs; this
#     build VM), each gateway task's host-mode port; iptables/ip6tables rules drop what does not
#     come from 127.0.0.0/8 while the check runs;
#  4. steps under bounded client load (python -m scripts.swarm_load; UNAVAILABLE retried once):
#     steady, kill an embedder container, kill an indexer replica's container, kill a gateway container,
#     scale the embedder 2 -> 3, `docker service update --force` the embedder; each reports
#     requests sent / failed / retried and how long Swarm took to be healthy again; then
#     Prometheus sees every task (3 embedders now) up and the web page still answers;
#  5. removes the stack, its volumes and secret, leaves the swarm it made, stops dockerd if it
#     started it (also on failure).
# Settings: SWARM_CHECK_KEEP=1 leaves the stack and swarm up; SWARM_CHECK_UP_TIMEOUT (900 s);
# SWARM_CHECK_WORKERS (2 load clients); SWARM_CHECK_STEP_TIMEOUT (300 s per step); the
# compose-check settings for the build (ARTIFACT_DIR, PREPARED_DIR, COMPOSE_CHECK_FRESH=1, ...).
set -Eeuo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
CHECK=swarm-check
WORK="$REPO/build/swarm"
START=$(date +%s)
# shellcheck source=scripts/lib/docker_check.sh
source "$REPO/scripts/lib/docker_check.sh"   # from here on, output is also in $LOG

STACK="${SWARM_CHECK_STACK:-mktcheck}"
export WRITE_TOKEN_SECRET="${STACK}_write_token"
export WRITE_TOKEN="check-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
export POSTGRES_PASSWORD_SECRET="${STACK}_postgres_password"
POSTGRES_PASSWORD="check-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
GATEWAY=""
TARGETS="$WORK/gateways.txt"
DISCOVERY_PID=""
MADE_GWBRIDGE=0
WORKERS="${SWARM_CHECK_WORKERS:-2}"
# one small host carries every task (4 embedders during a start-first update): reserve little
export EMBEDDER_CPU_RESERVATION=0.1 INDEXER_CPU_RESERVATION=0.1 GATEWAY_CPU_RESERVATION=0.1 \
  POSTGRES_CPU_RESERVATION=0.1 WEB_CPU_RESERVATION=0.1 PROMETHEUS_CPU_RESERVATION=0.1
SWARM_MADE=0
STACK_UP=0
GUARD_RULES=()   # "iptables|ip6tables RULE...", inserted by guard, deleted at the end
LABELLED_NODE=""
INDEXERS=(indexer-0a indexer-0b indexer-1a indexer-1b)   # two replicas of each of two shards
LABELS=("${INDEXERS[@]/#/marketplace.}" marketplace.postgres marketplace.images marketplace.monitoring)
REPORT=()

svc() { echo "${STACK}_$1"; }

cleanup() {
  local rc=$?
  set +e
  if [[ "${SWARM_CHECK_KEEP:-0}" == 1 && $rc -eq 0 ]]; then
    echo "SWARM_CHECK_KEEP=1: stack $STACK left up (gateway on $GATEWAY); dockerd PID ${DOCKERD_PID:-not ours}"
    stop_wheel_server
    return
  fi
  if [[ $rc -ne 0 && $STACK_UP == 1 ]]; then
    step "failure: state and recent logs"
    docker stack ps --no-trunc "$STACK" | head -40
    for s in gateway embedder "${INDEXERS[@]}" postgres web prometheus; do
      echo "--- $s"; docker service logs --no-task-ids --tail 20 "$(svc "$s")" 2>&1 | cut -c1-300
    done
  fi
  [[ -f "$WORK/load.stop" ]] || touch "$WORK/load.stop"
  [[ -n "$DISCOVERY_PID" ]] && { kill "$DISCOVERY_PID" 2>/dev/null; wait "$DISCOVERY_PID" 2>/dev/null; }
  if [[ $STACK_UP == 1 ]]; then
    step "remove the stack, its volumes and secret"
    docker stack rm "$STACK"
    for _ in $(seq 60); do
      [[ -z "$(docker ps -aq --filter "label=com.docker.stack.namespace=$STACK")" ]] \
        && [[ -z "$(docker network ls -q --filter "label=com.docker.stack.namespace=$STACK")" ]] && break
      sleep 2
    done
    docker volume ls -q --filter "label=com.docker.stack.namespace=$STACK" | xargs -r docker volume rm
  fi
  docker secret rm "$WRITE_TOKEN_SECRET" "$POSTGRES_PASSWORD_SECRET" >/dev/null 2>&1
  local rule
  for rule in "${GUARD_RULES[@]}"; do ${rule%%|*} -D ${rule#*|} 2>/dev/null; done
  if [[ -n "$LABELLED_NODE" && $SWARM_MADE == 0 ]]; then
    docker node update $(printf -- '--label-rm %s ' "${LABELS[@]}") "$LABELLED_NODE" >/dev/null
  fi
  if [[ $SWARM_MADE == 1 ]]; then
    step "leave the swarm this check made"
    docker swarm leave --force
    [[ $MADE_GWBRIDGE == 1 ]] && docker network rm docker_gwbridge >/dev/null 2>&1 \
      && echo "removed the docker_gwbridge network"
  fi
  stop_wheel_server
  stop_dockerd
  if ((${#REPORT[@]})); then
    step "summary"
    printf '%s\n' "${REPORT[@]}"
  fi
  say_outcome "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# healthy_count SERVICE [STATE]: running containers of a service in a health state (default healthy)
healthy_count() {
  docker ps -q --filter "label=com.docker.swarm.service.name=$(svc "$1")" --filter "health=${2:-healthy}" | wc -l
}

# wait_converged SERVICE REPLICAS [GONE_CONTAINER]: until exactly REPLICAS healthy containers run,
# none starting, and GONE_CONTAINER (a killed one) is not among them; prints the seconds taken
wait_converged() {
  local service=$1 replicas=$2 gone=${3:-} since deadline
  since=$(date +%s)
  deadline=$(( since + ${SWARM_CHECK_STEP_TIMEOUT:-300} ))
  while :; do
    if [[ $(healthy_count "$service") -eq $replicas && $(healthy_count "$service" starting) -eq 0 \
          && $(docker ps -q --filter "label=com.docker.swarm.service.name=$(svc "$service")" | wc -l) -eq $replicas ]] \
       && { [[ -z "$gone" ]] || ! docker ps -q --no-trunc | grep -q "^$gone"; }; then
      echo $(( $(date +%s) - since ))
      return 0
    fi
    (( $(date +%s) < deadline )) || { docker service ps "$(svc "$service")" >&2; return 1; }
    sleep 1
  done
}

one_container() {  # one_container SERVICE: the id of one of its running containers
  docker ps -q --no-trunc --filter "label=com.docker.swarm.service.name=$(svc "$1")" | head -1
}

# ---------------------------------------------------------------------------------------------
step "tools"
ensure_tools
prepare_images

# ---------------------------------------------------------------------------------------------
step "swarm"
state="$(docker info -f '{{.Swarm.LocalNodeState}}')"
if [[ "$state" == inactive ]]; then
  docker network inspect docker_gwbridge >/dev/null 2>&1 || MADE_GWBRIDGE=1   # swarm init makes it
  # on the loopback address: the check's swarm talks to nobody else
  # a longer heartbeat: dockerd runs at nice 19 on a shared, busy host, and missed heartbeats
  # made the node "disconnect" and Swarm restart every task (the default is 5 s)
  docker swarm init --advertise-addr 127.0.0.1 --listen-addr 127.0.0.1:2377 --dispatcher-heartbeat 30s >/dev/null
  SWARM_MADE=1
  echo "docker swarm init --advertise-addr 127.0.0.1: this node is a manager"
elif [[ "$(docker info -f '{{.Swarm.ControlAvailable}}')" != true ]]; then
  die "this Docker host is a swarm worker ($state): run the check on a manager or outside any swarm"
else
  echo "using the swarm this host is a manager of (stack $STACK)"
fi
docker node ls

if [[ -e /proc/net/ip_vs ]] || modprobe -q ip_vs 2>/dev/null; then
  MESH=1
  export GATEWAY_PUBLISHED_PORT="${GATEWAY_PUBLISHED_PORT:-$(free_port)}"
  echo "IPVS present: the gateway behind the routing mesh on port $GATEWAY_PUBLISHED_PORT"
else
  MESH=0
  export GATEWAY_PUBLISH_MODE=host GATEWAY_ENDPOINT_MODE=dnsrr GATEWAY_PUBLISHED_PORT=0
  export PUBLISH_MODE=host PUBLIC_ENDPOINT_MODE=dnsrr
  echo "no IPVS in this kernel (no routing mesh, no virtual IPs): every gateway task publishes a"
  echo "host-mode port on 127.0.0.1 and the load client follows the healthy ones, as a load balancer would;"
  echo "web and prometheus (one task each) publish host-mode ports"
fi
export WEB_PUBLISHED_PORT="${WEB_PUBLISHED_PORT:-$(free_port)}" PROMETHEUS_PUBLISHED_PORT="${PROMETHEUS_PUBLISHED_PORT:-$(free_port)}"
WEB="127.0.0.1:$WEB_PUBLISHED_PORT"
PROM="http://127.0.0.1:$PROMETHEUS_PUBLISHED_PORT"

step "deploy.sh refuses a stack without its secrets, and says how to make each"
docker secret rm "$WRITE_TOKEN_SECRET" "$POSTGRES_PASSWORD_SECRET" >/dev/null 2>&1 || true
if out="$(deploy/swarm/deploy.sh "$STACK" 2>&1)"; then
  STACK_UP=1; die "deploy.sh deployed a stack without its secrets"
fi
echo "$out"
for secret in "$WRITE_TOKEN_SECRET" "$POSTGRES_PASSWORD_SECRET"; do
  grep -q "docker secret create $secret" <<<"$out" || die "the refusal does not say how to create $secret"
done
echo "ok  refused, naming 'docker secret create $WRITE_TOKEN_SECRET' and '... $POSTGRES_PASSWORD_SECRET'"

step "secrets, node labels, deploy"
printf '%s' "$WRITE_TOKEN" | docker secret create "$WRITE_TOKEN_SECRET" - >/dev/null
printf '%s' "$POSTGRES_PASSWORD" | docker secret create "$POSTGRES_PASSWORD_SECRET" - >/dev/null
LABELLED_NODE="$(docker info -f '{{.Swarm.NodeID}}')"
docker node update $(printf -- '--label-add %s=true ' "${LABELS[@]}") "$LABELLED_NODE" >/dev/null
echo "labels on this node: ${LABELS[*]}"
deploy_start=$(date +%s)
STACK_UP=1
deploy/swarm/deploy.sh "$STACK"
# Published ports listen on every address of the host: drop what does not come from loopback.
# IPv4 reaches the gateways through DNAT and FORWARD, where DOCKER-USER runs before Docker's own
# rules (the mesh keeps the published port, a host-mode port becomes the container's 50050);
# IPv6 reaches docker-proxy itself, on host-mode ports Docker picks from the ephemeral range.
guard() { "${1%%|*}" -I ${1#*|} && GUARD_RULES+=("$1"); }
if [[ $MESH == 1 ]]; then
  for port in "$GATEWAY_PUBLISHED_PORT" "$WEB_PUBLISHED_PORT" "$PROMETHEUS_PUBLISHED_PORT"; do
    guard "iptables|DOCKER-USER -p tcp --dport $port ! -s 127.0.0.0/8 -j DROP"
  done
else
  for port in 50050 8000 9090; do   # the containers' ports, after DNAT
    guard "iptables|DOCKER-USER -p tcp --dport $port ! -s 127.0.0.0/8 -j DROP"
  done
  guard "iptables|INPUT ! -i lo -p tcp -m multiport --dports $WEB_PUBLISHED_PORT,$PROMETHEUS_PUBLISHED_PORT ! -s 127.0.0.0/8 -j DROP"
  read -r low high </proc/sys/net/ipv4/ip_local_port_range
  guard "ip6tables|INPUT ! -i lo -p tcp --dport $low:$high -m conntrack --ctstate NEW -j DROP" \
    || echo "warning: no ip6tables rule: host-mode ports may answer on IPv6 addresses"
fi
echo "only 127.0.0.0/8 reaches the gateways: ${GUARD_RULES[*]}"

declare -A REPLICAS=([indexer-0a]=1 [indexer-0b]=1 [indexer-1a]=1 [indexer-1b]=1 [embedder]=2 [gateway]=2
                     [postgres]=1 [web]=1 [prometheus]=1)
for service in postgres "${INDEXERS[@]}" embedder gateway web prometheus; do
  took="$(wait_converged "$service" "${REPLICAS[$service]}")" \
    || die "$service: ${REPLICAS[$service]} healthy tasks not reached in time"
  echo "ok  $service: ${REPLICAS[$service]}/${REPLICAS[$service]} healthy ($(elapsed "$deploy_start") after deploy)"
done
# where the gateways answer: the mesh port, or each healthy task's host port (kept current
# in the background, as a load balancer's health checks keep its target list)
write_targets() {
  local c found=()
  if [[ $MESH == 1 ]]; then
    found=("127.0.0.1:$GATEWAY_PUBLISHED_PORT")
  else
    for c in $(docker ps -q --filter "label=com.docker.swarm.service.name=$(svc gateway)" --filter health=healthy); do
      # (|| true: a container killed since `docker ps` has no port, and pipefail would end the loop)
      found+=("$( (docker port "$c" 50050/tcp 2>/dev/null || true) | sed -n '1s/.*:\([0-9]*\)$/127.0.0.1:\1/p')")
    done
  fi
  printf '%s\n' "${found[@]}" | grep . >"$TARGETS.new" || true
  [[ -s "$TARGETS.new" ]] && mv "$TARGETS.new" "$TARGETS"
  return 0
}
write_targets
[[ -s "$TARGETS" ]] || die "no gateway reachable on 127.0.0.1"
if [[ $MESH == 0 ]]; then
  rm -f "$WORK/discovery.stop"
  (while [[ ! -f "$WORK/discovery.stop" ]]; do write_targets; sleep 1; done) &
  DISCOVERY_PID=$!
fi
GATEWAY="$(head -1 "$TARGETS")"
# the gateway's readiness entry follows the embedder and every shard
for _ in $(seq 60); do
  "$GRPCURL" -plaintext -d '{"service": "marketplace.gateway.v1.Gateway"}' "$GATEWAY" grpc.health.v1.Health/Check \
    2>/dev/null | grep -q '"SERVING"' && break
  sleep 2
done
healthy_after="$(elapsed "$deploy_start")"
echo "gateways: $(tr '\n' ' ' <"$TARGETS")"
REPORT+=("stack healthy ${healthy_after} after deploy (2 gateways on PostgreSQL, 2 embedders, 2 indexer shards x 2 replicas, web, prometheus; gateway $([[ $MESH == 1 ]] && echo "behind the routing mesh" || echo "tasks on host-mode ports, no IPVS here"))")
docker service ls --filter "label=com.docker.stack.namespace=$STACK"

# ---------------------------------------------------------------------------------------------
index_in_swarm() {  # index_in_swarm ARGS...: index_catalogue on the stack's network
  if [[ $1 == --artifact ]]; then
    docker run --rm --network "${STACK}_internal" -v "$ARTIFACT_DIR:/artifacts:ro" \
      -e WRITE_TOKEN -e EMBEDDER_ADDR=dns:///embedder:50051 \
      -e GATEWAY_DB=postgresql://marketplace@postgres:5432/catalogue -e "GATEWAY_DB_PASSWORD=$POSTGRES_PASSWORD" \
      -e "INDEXER_SHARDS=$(docker service inspect -f '{{range .Spec.TaskTemplate.ContainerSpec.Env}}{{println .}}{{end}}' \
           "$(svc gateway)" | sed -n 's/^INDEXER_SHARDS=//p')" \
      "marketplace-gateway:latest" python -m services.gateway.index_catalogue "$@"
  else
    docker exec "$(one_container gateway)" python -m services.gateway.index_catalogue "$@"
  fi
}
run_sample_queries "$GATEWAY" index_in_swarm

step "the web edge on $WEB"
check_web_edge "$WEB"
step "Prometheus ($PROM) scrapes every task of every service"
# 2 gateways, 2 embedders, 4 indexer replicas, Prometheus itself
check_prometheus_up "$PROM" 9

# ---------------------------------------------------------------------------------------------
mapfile -t load_photos < <(cd "$REPO" && "$PY" -c "import sys; sys.path.insert(0, '.')
from tests.support.photos import photo_files
print('\n'.join(map(str, photo_files(4))))" 2>/dev/null || true)
((${#load_photos[@]})) || mapfile -t load_photos < <(find "$PREPARED_DIR/images" -name '*.jpg' | sort | sed -n 1,4p)
TOTAL_SENT=0
TOTAL_FAILED=0

# under_load NAME ACTION...: start the load, run ACTION (which waits until Swarm converged), keep
# the load a few seconds more, stop it and report its counts
under_load() {
  local name=$1; shift
  step "under load: $name"
  rm -f "$WORK/load.stop" "$WORK/load.json"
  (cd "$REPO" && nice -n 5 "$PY" -m scripts.swarm_load --targets-file "$TARGETS" --workers "$WORKERS" \
     $(printf -- '--photo %s ' "${load_photos[@]}") --stop-file "$WORK/load.stop" \
     --max-seconds "$(( ${SWARM_CHECK_STEP_TIMEOUT:-300} + 60 ))" --out "$WORK/load.json" >/dev/null) &
  local load_pid=$! outcome
  sleep 5
  outcome="$("$@")" || { touch "$WORK/load.stop"; wait "$load_pid"; die "$name: $outcome"; }
  sleep 5
  touch "$WORK/load.stop"
  wait "$load_pid" || die "$name: the load client failed"
  local sent failed retried p50 p99
  read -r sent failed retried p50 p99 < <(jq -r '"\(.sent) \(.failed) \(.retried) \(.p50_ms) \(.p99_ms)"' "$WORK/load.json")
  TOTAL_SENT=$((TOTAL_SENT + sent))
  TOTAL_FAILED=$((TOTAL_FAILED + failed))
  local line
  line="$(printf '%-36s sent %5d  failed %3d  retried %3d  p50 %6s ms  p99 %6s ms  %s' \
    "$name" "$sent" "$failed" "$retried" "$p50" "$p99" "$outcome")"
  [[ $failed == 0 ]] || line+="  errors $(jq -c .errors "$WORK/load.json")"
  echo "$line"
  REPORT+=("$line")
}

steady() {  # also what each container uses under this load (for the resource settings)
  sleep 10
  docker stats --no-stream --format '{{.Name}} {{.CPUPerc}} {{.MemUsage}}' \
    $(docker ps -q --filter "label=com.docker.stack.namespace=$STACK") | sed 's/^/    under load: /' >&2
  sleep 5
  echo "(nothing changed)"
}
kill_one() {  # kill_one SERVICE REPLICAS
  local victim took
  victim="$(one_container "$1")"
  docker kill "$victim" >/dev/null
  took="$(wait_converged "$1" "$2" "$victim")" || { echo "not replaced in time"; return 1; }
  echo "killed ${victim:0:12}, replaced and healthy in ${took}s"
}
scale_embedder() {
  local took
  docker service scale --detach "$(svc embedder)=3" >/dev/null
  took="$(wait_converged embedder 3)" || { echo "3 replicas not healthy in time"; return 1; }
  echo "3/3 healthy in ${took}s"
}
roll_embedder() {
  local since took
  since=$(date +%s)
  docker service update --force --quiet "$(svc embedder)" >/dev/null 2>"$WORK/update.err" \
    || { cat "$WORK/update.err"; echo "service update failed"; return 1; }
  took="$(wait_converged embedder 3)" || { echo "rolling restart did not converge"; return 1; }
  echo "3 tasks replaced one at a time, healthy in $(( $(date +%s) - since ))s"
}

docker stats --no-stream --format '{{.Name}} {{.CPUPerc}} {{.MemUsage}}' \
  $(docker ps -q --filter "label=com.docker.stack.namespace=$STACK") | sed 's/^/    idle: /'
under_load "steady (no fault)" steady
under_load "kill one embedder container" kill_one embedder 2
under_load "kill one indexer container (indexer-0a)" kill_one indexer-0a 1
under_load "kill one gateway container" kill_one gateway 2
under_load "scale embedder 2 -> 3" scale_embedder
under_load "service update --force embedder" roll_embedder
REPORT+=("all steps: sent $TOTAL_SENT, failed $TOTAL_FAILED")

step "after the faults: Prometheus sees every task up (3 embedders now), the web page answers"
since=$(date +%s)
check_prometheus_up "$PROM" 10 240   # the replaced tasks' old addresses drop out of DNS discovery
REPORT+=("Prometheus: up == 1 for all 10 targets (2 gateways, 3 embedders, 4 indexer replicas, itself) $(( $(date +%s) - since ))s after the last step")
check_web_edge "$WEB"
REPORT+=("web edge after the faults: page, /api/health ready, /predict/image, /api/search, photo: ok")
[[ $TOTAL_FAILED == 0 ]] || die "$TOTAL_FAILED requests failed under the faults (target 0)"
